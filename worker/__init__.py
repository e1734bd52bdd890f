"""The Celery side of blipq: fetching and decoding images, the resident model, the tasks and the reaper.

Importing this package (or `worker.settings`) never imports torch: `blipq` reads the worker's settings, and the worker
imports the model code only when it loads its model. What the worker shares with the API lives in `contract`.
"""
