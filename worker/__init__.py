"""The Celery side of blipq: the job contract shared with the API, images, inference and tasks.

Importing this package (or `worker.contract.jobs`, `worker.settings`, `worker.contract.images`) never imports torch: the
API shares these modules, and the worker imports the model code only when it loads its model.
"""
