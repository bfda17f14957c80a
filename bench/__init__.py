"""`make bench` / `python -m bench`: Runwarden's performance benchmark (issue 7).

API economy, overhead against a bare client, scale to 1,000 Orchestrators and quota pacing, on
the real apiserver, the Cloud Run emulator and the controller as a process. See bench/README.md.
"""
