"""The results format: Arrow schema and version, row record, run-directory layout, ids, cells.

Writers (the orchestrator) and readers (reports) share only this; it imports nothing else of ours.
"""
