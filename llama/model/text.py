"""The check every tokenizer makes of the text it is given (sentencepiece and tokenizer.json)."""
from llama.errors import BadInput


def check_text(text: str):
    """Refuse text that is not Unicode: a lone surrogate, as JSON's "\\ud800" makes, or as Python
    makes of bytes that are not UTF-8 (command lines, stdin); sentencepiece cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        shown = text[max(error.start - 10, 0):error.start + 10]
        raise BadInput(f"the text {shown!r} holds {text[error.start]!r} at character "
                       f"{error.start}, which is not a Unicode character (bytes that are not "
                       "UTF-8, or a lone surrogate): give UTF-8 text") from None
