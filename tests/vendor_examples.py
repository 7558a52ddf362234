"""The vendor document's curl examples, copied verbatim (see shared/seed/automation-api.txt).

Only the URL ('' in the document) and the upload's path are filled in by the tests.
The document's web copy has no-break spaces (U+00A0) where spaces belong, at the
start of each continued line and inside the e-mail placeholder; a shell would pass
them to curl as arguments, so they are plain spaces here.
"""

CREATE = """curl --location -vvv --request POST '' \\
 -F 'title="A new signing order"' \\
 -F 'description="This order was automatically generated"' \\
 -F 'upload=@"/Users/me/Documents/signthisplease.pdf"' \\
 -F 'dueDate="2024-12-24T00:00:00"' \\
 -F 'solicitor="{\\"source\\":\\"INTERNAL\\",\\"identifier\\":\\"sAMAccountName=cborgstrom\\",\\"attributes\\":{}}"' \\
 -F 'signers="{\\"source\\":\\"INTERNAL\\",\\"identifier\\":\\"sAMAccountName=cborgstrom\\",\\"attributes\\":{}}"' \\
 -F 'signers="{\\"source\\":\\"EXTERNAL\\",\\"identifier\\":\\"198603052385\\",\\"attributes\\":{\\"mail\\":{\\"value\\":\\"[email protected]\\"},\\"mobile\\":{\\"value\\":\\"+46700000000\\"}}}"'"""

READ = "curl --location --request GET ''"
STATE = "curl --location --request GET ''"
DOCUMENT = "curl --location --request GET ''"
UPLOAD_PATH = "/Users/me/Documents/signthisplease.pdf"


def fill(example: str, url: str, upload: str | None = None) -> str:
    """The example with its URL (and upload path) filled in."""
    filled = example.replace("''", f"'{url}'", 1)
    return filled.replace(UPLOAD_PATH, upload) if upload else filled
