# An agent: HTTPS_PROXY and SSL_CERT_FILE (eval "$(spendgate env)") and VAULT_KEY in its environment.
import os

import resend
import stripe

stripe.ca_bundle_path = os.environ["SSL_CERT_FILE"]     # stripe-python pins its own CA bundle
client = stripe.StripeClient(os.environ["VAULT_KEY"])   # the vault key goes where the real key would
pi = client.v1.payment_intents.create(params={"amount": 2000, "currency": "usd", "confirm": True,
                                              "payment_method": "pm_card_visa"})  # a $20 charge

resend.api_key = os.environ["VAULT_KEY"]                # same key, any vendor its policy allows
resend.Emails.send({"from": "shop@example.com", "to": "you@example.com", "subject": "Paid", "html": pi.id})
print("charged and emailed:", pi.id, pi.status)
