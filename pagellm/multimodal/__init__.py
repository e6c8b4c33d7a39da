"""Images in prompts (issue 18 part 2): what a prompt's images become before the engine core sees them.

    media.py       an image_url (data:, file://, http(s)://) -> PIL image, under the engine's media rules
    chat_parts.py  chat messages with image_url parts -> text with the model's placeholder, and the image URLs
    families.py    per vision architecture: placeholder, image token, processor outputs, tokens per image
    processing.py  images + prompt token ids -> placeholders expanded, one MultiModalFeature per image
    inputs.py      MultiModalFeature: tensors as bytes, placeholder span, content hash (prefix-cache key)

The model runner encodes a feature's image when a step first reaches its span (worker/mm_embeds.py); the model
class provides the interface of models/interface.py's VisionLanguageModel.
"""
