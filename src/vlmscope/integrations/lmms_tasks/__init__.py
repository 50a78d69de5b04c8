"""vlmscope's benchmarks as lmms-eval tasks: the YAML files in this folder and their functions (`utils.py`).

    lmms-eval --include_path "$(vlmscope lmms-tasks-path)" --tasks vlmscope_pope_aokvqa_random --model vlmscope ...

Nothing here imports lmms-eval: lmms-eval reads the YAML files and loads `utils.py` next to them itself.
"""
