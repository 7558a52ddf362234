"""The reference implementation of the Automation API: the gateway's default upstream.

The gateway never imports this package; it talks to it over HTTP, exactly as it
talks to the vendor's own server.
"""
