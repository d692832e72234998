"""Human-preference arena: blind pairwise votes between models served behind any
OpenAI-compatible endpoint, stored in a database, rated with Bradley-Terry (the Latxa Instruct
study's evaluation loop, ``HiTZ/ebaluatoia``).

Modules, one job each: ``config`` (the YAML), ``votes`` (the record), ``store`` + ``migrate``
+ ``schema`` (the database), ``ratings`` (Bradley-Terry, bootstrap, online Elo), ``sources``
(reading/exporting vote files), ``plot``, ``pairing``, ``endpoints`` (streaming answers),
``rounds`` (one round, framework-free), ``leaderboard``, ``markup`` (answers as Markdown),
``page`` (Gradio), ``server``, ``cli`` and ``client`` (scripted participants). Nothing here
imports jax or the model stack.
"""
