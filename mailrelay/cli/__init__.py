"""The ``mailrelay`` command line."""
