"""A mutual-TLS security gateway for the Signing Workflow Automation API."""

__version__ = "0.1.0"
