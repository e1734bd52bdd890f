"""The HTTP edge of blipq: a Flask API that validates jobs, enqueues them in Redis and reports on them.

Nothing here imports torch or transformers.
"""
