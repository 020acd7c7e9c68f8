"""Studies: end-to-end reproductions that compose the rest of saelab.

lists.py      when does a list end (seeds/000, STUDIES.md §1)
synthetic.py  are SAE-built activations as realistic as real ones (seeds/001, §2)

Each study has a `register(study_app)` in its `*_commands.py` mounting `saelab study NAME`.
"""
