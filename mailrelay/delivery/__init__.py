"""Delivery of queued messages: to local mailboxes and to remote MX hosts."""
