"""The command line: `gateway ...`, check and explain, the development PKI."""
