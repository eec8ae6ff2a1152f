"""What the server allows: users, aliases, senders, routing, SRS and the checks of inbound mail."""
