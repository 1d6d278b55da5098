//! bpe_rs: a byte-level BPE trainer for nanochat-jax, exposed to Python.
//!
//! ```python
//! import bpe_rs
//! tok = bpe_rs.Tokenizer()
//! tok.train_from_iterator(iter(texts), vocab_size=4096)   # streams, releases the GIL
//! ranks = tok.get_mergeable_ranks()                       # [(bytes, rank), ...] for tiktoken.Encoding
//! pattern = tok.get_pattern()
//! ```
//! Same API and same learned merges as the `rustbpe` package (nanochat's reference trainer).

pub mod split;
pub mod train;

use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};

use split::{Splitter, GPT4_PATTERN, NANOCHAT_PATTERN};

/// A byte-level BPE trainer: GPT-4 style split (nanochat's `\p{N}{1,2}` pattern by default), then merges.
#[pyclass(module = "bpe_rs")]
pub struct Tokenizer {
    merges: Vec<(u32, u32)>,
    pattern: String,
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        Tokenizer { merges: Vec::new(), pattern: NANOCHAT_PATTERN.to_string() }
    }

    /// Train from an iterable of str, read `buffer_size` items at a time (memory stays bounded by the unique chunks).
    /// Learns up to `vocab_size - 256` merges; fewer when the text runs out of pairs (see `vocab_size`).
    #[pyo3(signature = (iterator, vocab_size, buffer_size=8192, pattern=None))]
    #[pyo3(text_signature = "(self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        let vocab_size = u32::try_from(vocab_size)
            .map_err(|_| PyValueError::new_err(format!("vocab_size is too large: {vocab_size}")))?;
        if buffer_size < 1 {
            return Err(PyValueError::new_err(format!("buffer_size must be at least 1, got {buffer_size}")));
        }
        let buffer_size = buffer_size as usize;
        let pattern = pattern.unwrap_or_else(|| NANOCHAT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(PyValueError::new_err)?;

        let mut iter = iterator.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "train_from_iterator needs an iterable of str, got {}",
                type_name(iterator)
            ))
        })?;
        // Pipeline: while a worker splits and counts batch k (without the GIL), this thread pulls batch k+1 from the
        // Python iterator. Each batch is copied into one owned buffer, so the worker never touches Python objects.
        let counter = train::ChunkCounter::new();
        let (mut num_docs, mut num_bytes) = (0u64, 0u64);
        std::thread::scope(|scope| -> PyResult<()> {
            let mut pending: Option<std::thread::ScopedJoinHandle<'_, Result<(), String>>> = None;
            let wait = |handle: std::thread::ScopedJoinHandle<'_, Result<(), String>>| -> PyResult<()> {
                let result = py.allow_threads(|| handle.join());
                match result {
                    Ok(r) => r.map_err(PyValueError::new_err),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            };
            loop {
                let batch = Batch::pull(&mut iter, buffer_size, num_docs)?;
                num_docs += batch.ends.len() as u64;
                num_bytes += batch.text.len() as u64;
                if let Some(handle) = pending.take() {
                    wait(handle)?;
                }
                py.check_signals()?;
                if batch.ends.is_empty() {
                    return Ok(());
                }
                let full = batch.ends.len() == buffer_size;
                let (counter, splitter) = (&counter, &splitter);
                pending = Some(scope.spawn(move || counter.add_batch(&batch.docs(), splitter)));
                if !full {
                    return wait(pending.take().unwrap());
                }
            }
        })?;
        if num_bytes == 0 {
            return Err(PyValueError::new_err(if num_docs == 0 {
                "no text to train on: the iterator yielded nothing".to_string()
            } else {
                format!("no text to train on: all {num_docs} strings from the iterator are empty")
            }));
        }
        let merges = py.allow_threads(|| {
            let (chunks, counts) = counter.finish();
            train::train(&chunks, &counts, vocab_size)
        });
        self.merges = merges;
        self.pattern = pattern;
        Ok(())
    }

    /// The split pattern (a regex string).
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// The mergeable ranks for `tiktoken.Encoding`: `[(token_bytes, rank), ...]`, ranks 0..vocab_size in order.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(Bound<'py, PyBytes>, u32)> {
        train::token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(rank, bytes)| (PyBytes::new(py, bytes), rank as u32))
            .collect()
    }

    /// The learned merges, in order: `[(left_id, right_id), ...]`; merge k makes token 256 + k.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.merges.clone()
    }

    /// The vocabulary size learned so far: 256 byte tokens + the number of merges.
    #[getter]
    fn vocab_size(&self) -> u32 {
        256 + self.merges.len() as u32
    }

    fn __repr__(&self) -> String {
        format!("bpe_rs.Tokenizer(vocab_size={})", 256 + self.merges.len())
    }
}

/// Up to `buffer_size` strings from a Python iterator, copied into one buffer.
struct Batch {
    text: String,
    ends: Vec<usize>,
}

impl Batch {
    fn pull(iter: &mut Bound<'_, PyIterator>, buffer_size: usize, first_index: u64) -> PyResult<Batch> {
        let mut batch = Batch { text: String::new(), ends: Vec::with_capacity(buffer_size) };
        for item in iter.by_ref().take(buffer_size) {
            let item = item?;
            let s = item.downcast::<PyString>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "train_from_iterator: the iterator must yield str, but item {} is {}",
                    first_index + batch.ends.len() as u64,
                    type_name(&item)
                ))
            })?;
            let text = s.to_str().map_err(|e| {
                PyValueError::new_err(format!(
                    "train_from_iterator: item {} is not valid text: {e}",
                    first_index + batch.ends.len() as u64
                ))
            })?;
            batch.text.push_str(text);
            batch.ends.push(batch.text.len());
        }
        Ok(batch)
    }

    fn docs(&self) -> Vec<&str> {
        let mut start = 0;
        self.ends
            .iter()
            .map(|&end| {
                let doc = &self.text[start..end];
                start = end;
                doc
            })
            .collect()
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".to_string())
}

/// Split `text` into the chunks BPE trains on. `fast=False` forces fancy-regex (for testing the fast matcher).
#[pyfunction]
#[pyo3(signature = (text, pattern=None, fast=true))]
fn split_text(text: &str, pattern: Option<&str>, fast: bool) -> PyResult<Vec<String>> {
    // fancy-regex compiles slowly: keep the splitters made so far.
    static CACHE: Mutex<Vec<(String, bool, Arc<Splitter>)>> = Mutex::new(Vec::new());
    let pattern = pattern.unwrap_or(NANOCHAT_PATTERN);
    let splitter = {
        let mut cache = CACHE.lock().unwrap();
        match cache.iter().find(|(p, f, _)| p == pattern && *f == fast) {
            Some((_, _, s)) => s.clone(),
            None => {
                let s = if fast { Splitter::new(pattern) } else { Splitter::regex(pattern) };
                let s = Arc::new(s.map_err(PyValueError::new_err)?);
                if cache.len() >= 16 {
                    cache.remove(0);
                }
                cache.push((pattern.to_string(), fast, s.clone()));
                s
            }
        }
    };
    let mut out = Vec::new();
    splitter.split(text, |p| out.push(p.to_string())).map_err(PyValueError::new_err)?;
    Ok(out)
}

#[pymodule]
fn bpe_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add("NANOCHAT_PATTERN", NANOCHAT_PATTERN)?;
    m.add("GPT4_PATTERN", GPT4_PATTERN)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
