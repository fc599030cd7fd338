"""`ordo console`: the operator console, a small web application over the ledger and JetStream.

One process (aiohttp), pages built in Python (html.py) and one stylesheet
served from the package, so it works with no internet. It reads through
ledger/ (ledger/console.py; one execution through daemon/inspect.py) and
changes things as the command line does (changes.py); the Live page samples the
workers' metrics (live.py). Who may see and change what is auth.py's; the
routes and the guard in front of them are app.py's; what handlers share, state.py's.
"""
