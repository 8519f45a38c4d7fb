"""The micro world: a procedurally generated image world and the small models the project builds on it.

Everything that is specific to it lives here, in one place:

* ``world``: the generator (deterministic: seed in, 64x64 image and its labels out; 8 objects, 8 colours, 7 styles,
  with synonyms, neighbours and caption templates);
* ``clip``: the micro CLIP, the offline zero-shot scorer (weights in ``clip/``, with its model card);
* ``judge``: an independent ground-truth CNN that checks CLIP's verdicts (weights in ``judge/``);
* ``sd_model``: the micro Stable Diffusion's architecture and schedulers;
* ``training`` and ``train_utils``: how the CLIP, VAE and UNet are trained, exported to ``pipelines/micro/`` (the
  shipped pipeline folder, found by ``pipelines.micro_model_path()``) and evaluated.

It sits above ``pipelines`` (which only loads the exported folder like any other Stable Diffusion) and beside the
scorer, probes, suites and audits of ``evals``, which read their concepts from ``world``.
"""
