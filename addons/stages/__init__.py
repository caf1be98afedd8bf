"""The pipeline stages, one module each; ``spendgate.gateway`` lists them in order."""
