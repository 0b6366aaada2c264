"""Data that ships offline: GLUE and CoNLL-2003 files and text corpora (`text`), image datasets (`images`)."""
