"""The 60 prompt templates used to initialise the classifier (docs/method.md, "The classifier and guidance"),
and LIFT's single prompt, the ablation ``classifier_init: single``."""

TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "an origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "an embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
)

assert len(TEMPLATES) == 60

#: LIFT's single prompt (`ModelConfig.classifier_init` "single")
SINGLE_TEMPLATE = ("a photo of a {}.",)

#: the prompt set of each `ModelConfig.classifier_init`
CLASSIFIER_TEMPLATES = {"templates": TEMPLATES, "single": SINGLE_TEMPLATE}


def prompt_name(class_name: str) -> str:
    """A class name as the prompts spell it: underscores become spaces, no spaces around it."""
    return class_name.replace("_", " ").strip()


def prompts_for(class_name: str, templates=TEMPLATES) -> list[str]:
    """Fill every template with the class name (`prompt_name`)."""
    name = prompt_name(class_name)
    return [t.format(name) for t in templates]
