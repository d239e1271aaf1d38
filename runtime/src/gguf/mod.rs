//! GGUF v3 reader (zero-copy over memmap2) and writer.
//! PLACEHOLDER: being written (owned by the GGUF helper).
