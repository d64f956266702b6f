"""Networks of the multi-task agents: one configurable multi-task MLP, encoders, task information."""
