"""The thin streaming layer: Faust app, topics, agents, schemas, the embedded stack and the CLI."""
