"""The `blipq` command line and the Python client: `blipq api|worker|up|tag|...`, `BlipqClient`, the stack launcher and
the generator of the docs' reference pages.

It runs beside the service, not inside it: it may import the settings of both processes (to start them and to write
their docs), and neither process imports it.
"""
