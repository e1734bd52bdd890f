"""The job contract that the API and the workers share: everything both processes must agree on, in one place.

- `states`: a job's statuses, tasks and priorities;
- `transitions`: what the scripts that move a job from one status to the next take and answer;
- `lua`: the Redis Lua scripts, read from their files (`scripts/*.lua`) and registered with a client;
- `keys`: every Redis key blipq spells (the `blipq:` prefixes, the functions that build keys from ids);
- `jobs` and `job_store`: a job's record, and the store that moves it (`JobStore`): acceptance, start, end, withdrawal;
- `batches`, `batch_store` and `batch_scripts`: a batch's record, items and chunks, its store (`BatchStore`), and
  what its scripts take;
- `broker`: the Celery app, the task (message) names and how a job or chunk is published;
- `fleet`: the worker records the API reads to know who is serving which task;
- `redis_target`: one Redis or a Sentinel group, as every client of the store and the broker reaches it;
- `images`: what an image may be (formats, size, pixels), checked by the API on upload and by the worker on fetch;
- `errors`: the error codes a client can see;
- `settings`: the settings both processes read and must agree on;
- `logs`: the one log line format.

Nothing here imports Flask or torch, nor `api` or `worker`: both processes import it, and it imports neither.
"""
