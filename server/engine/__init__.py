"""The inference engine: scheduler, runner, loader and the async front end.

Deliberately empty: ``autoglm_server.engine.api`` must stay importable without
torch (front ends and clients import it), so nothing here imports the engine.
Import ``autoglm_server.engine.engine.build_engine`` explicitly.
"""
