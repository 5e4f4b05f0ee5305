"""Public identifiers in OpenAI's style (`file-…`, `batch_…`)."""

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"
