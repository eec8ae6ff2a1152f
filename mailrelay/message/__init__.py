"""Steps on a message's bytes: headers, trace fields, DKIM, ARC and filters."""
