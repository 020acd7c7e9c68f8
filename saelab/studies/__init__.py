"""Studies: end-to-end reproductions that compose the rest of saelab.

lists.py      when does a list end (lists_config <- lists_ablation, lists_results,
              lists_report <- lists <- lists_commands; no import goes back up)
synthetic.py  are SAE-built activations as realistic as real ones

Each study has a `register(study_app)` in its `*_commands.py` mounting `saelab study NAME`;
stage_lines.py shows their progress (bars on a terminal, lines when piped), timings.py
keeps their stage times across reruns.
"""
