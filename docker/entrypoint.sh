#!/bin/sh
# Create the CA on first start (kept in the /app/certs volume), publish its *public* certificate
# for agents (never the private key), then run the command (spendgate run ...).
set -eu
spendgate ca --dir /app/certs >/dev/null
if [ -n "${SPENDGATE_CA_EXPORT:-}" ]; then
  cp /app/certs/mitmproxy-ca-cert.pem "$SPENDGATE_CA_EXPORT/mitmproxy-ca-cert.pem.tmp"
  mv "$SPENDGATE_CA_EXPORT/mitmproxy-ca-cert.pem.tmp" "$SPENDGATE_CA_EXPORT/mitmproxy-ca-cert.pem"
fi
exec "$@"
