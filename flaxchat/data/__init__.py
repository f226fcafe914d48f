"""Pretraining and tokenizer text: the generated demo corpus, named remote datasets
(downloaded from Hugging Face), and parquet directories on disk or in GCS.

Only the error types live here so `import flaxchat.data` stays free of pyarrow/requests;
the work is in `demo_corpus`, `download` and `sources`.
"""


class DataError(ValueError):
    """Data that cannot be used as given; the message names the path and the fix."""


class DownloadError(DataError):
    """A remote shard that could not be fetched even after retries; names the URL."""


__all__ = ["DataError", "DownloadError"]
