"""DKIM (RFC 6376, RFC 8463): keys under ``domains/<domain>/dkim:<selector>.pem`` and a
fast signer for the mail we send from our domains."""
