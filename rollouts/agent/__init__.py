"""Multi-turn rollouts: the policy calls tools and acts in environments (docs/multiturn.md).

- tools.py: tools and environments named in the config, resolved, with JSON schemas;
- builtin_tools.py: ``calculator`` and ``python``;
- parsing.py: tool calls read from a turn's text (Hermes/Qwen, Llama 3);
- chat.py: prompts with tools and tool results as tokens, through the chat template;
- execute.py: calls run at once across trajectories, with deadlines, failures as text;
- loop.py: the turn loop, as an engine wrapping any engine (:class:`MultiTurnEngine`);
- summary.py: metrics, samples and reward columns of multi-turn rollouts.

Import the modules themselves (this package imports nothing, so that the light ones stay light).
"""
