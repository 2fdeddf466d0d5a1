"""``pama-ext compare``: a comparison of alignment methods a reviewer can check -- methods x settings x seeds on
the tiny world, resumable, with 95 % intervals over seeds and evaluation prompts, paired differences against a
baseline with verdicts, matched-budget and matched-KL tables, fronts with hypervolume intervals, and plots.

Modules: :mod:`.stats` (the statistics, pure), :mod:`.runner` (the grid, the process pool, the results),
:mod:`.report` (the tables), :mod:`.plots` (the figures), :mod:`.cli` (the command). docs/results.md holds the
study made with it.
"""
