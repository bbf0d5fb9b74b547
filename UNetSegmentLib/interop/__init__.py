"""Importers of foreign trained models (nnU-Net v2) into ordinary UNetSegment checkpoints.

`nnunet_plans` (torch- and numpy-free) reads and validates plans / dataset.json and the recipe record
stored in a checkpoint's metadata; `nnunet_preprocessing` replays nnU-Net's preprocessing and export
in numpy; `nnunet_inference` runs an imported model the way nnUNetPredictor does (the pipeline calls
it when a checkpoint carries an nnU-Net recipe); `nnunet_import` turns a results folder into a
checkpoint or a fold ensemble.
"""
