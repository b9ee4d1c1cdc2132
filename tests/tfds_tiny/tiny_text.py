"""`tiny_text`: a TFDS builder over generated text, so tests exercise the tfds source offline.

Prepare it with `TinyText(data_dir=d).download_and_prepare(file_format="array_record")`; nothing
is downloaded. Splits: train (DOCUMENTS["train"]) and validation (DOCUMENTS["validation"]).
"""

import tensorflow_datasets as tfds

_WORDS = ("thou", "art", "naïve", "café", "east", "sun", "night", "rose", "sweet", "name")


def _document(i: int) -> str:
  # Lengths vary from a few words to several packed rows; lines and unicode exercise the tokenizer.
  words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(5 + 23 * (i % 5))]
  lines = [" ".join(words[k:k + 6]) for k in range(0, len(words), 6)]
  return f"DOC {i}\n" + "\n".join(lines) + "\n"


DOCUMENTS = {
    "train": [_document(i) for i in range(12)],
    "validation": [_document(100 + i) for i in range(3)],
}


class TinyText(tfds.core.GeneratorBasedBuilder):
  """Generated documents with a single `text` feature."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated test documents."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(docs) for split, docs in DOCUMENTS.items()}

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      yield i, {"text": text}
