"""The application layer: opens encoders for jobs (index, eval, search, serve) and holds the search service.

It sits above engine/ (decode, runtimes, index, search, metrics) and export/ (makes artefacts);
cli/ and web/ only parse, call it and print.
"""
