"""Request and response schemas (pydantic), by resource, and the translation of request errors into stable codes.

The response models, and the request models of forms, query strings and headers, validate nothing at run time: they
describe what the API answers and takes, for /openapi.json (the views read forms, queries and headers themselves).

- `errors`: the body of every error response, and request errors into stable error codes
- `fields`: what jobs and batches validate alike (question, prompt, deadline), their descriptions, upload fields
- `jobs`, `batches`: each resource's requests, forms, query strings and responses, and the validation of its body
- `ops`: the operations routes' answers (health, readiness, models, stats, metrics)
"""
