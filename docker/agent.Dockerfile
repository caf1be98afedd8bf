# An example agent container: the vendors' SDKs and nothing of spendgate. It reaches the
# vendors only through the gateway (HTTPS_PROXY) and trusts only the gateway's CA.
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install httpx stripe openai anthropic \
 && useradd --system --create-home agent
USER agent
WORKDIR /home/agent
CMD ["sleep", "infinity"]
