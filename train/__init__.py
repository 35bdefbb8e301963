"""GMAI-VL's three-stage training recipe on our model and kernels: `gmaivl_rt.train.recipe.train` runs one stage.
Imported as `gmaivl_rt.train`."""
if __name__ == "train":  # the checkout root is on sys.path: not ours by that name (gmaivl_rt/bare_names.py)
    from gmaivl_rt.bare_names import hand_over

    hand_over(__name__, __file__)
