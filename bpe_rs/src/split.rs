//! Pre-tokenization: cut text into chunks before BPE.
//!
//! Two splitters share one interface:
//! - `Splitter::Fast`: a hand-written matcher for the GPT-4 style pattern (with `\p{N}{1,2}` as nanochat uses, or
//!   `\p{N}{1,3}` as GPT-4 does). It gives exactly the matches fancy-regex gives for that pattern, several times faster.
//! - `Splitter::Regex`: fancy-regex, for any other pattern.
//!
//! The Unicode classes `\p{L}`, `\p{N}` and `\s` are read from regex-syntax, the tables fancy-regex itself uses,
//! so both splitters agree on every code point.

use std::sync::OnceLock;

use fancy_regex::Regex;

/// nanochat's split pattern: GPT-4's, with numbers cut into groups of at most two digits.
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
/// GPT-4's split pattern (cl100k), the default of the `rustbpe` package.
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

// ------------------------------------------------------------------------------------------------------------------
// Character classes
// ------------------------------------------------------------------------------------------------------------------

/// Punctuation and everything else: not whitespace, not a letter, not a number.
const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 3;

/// Code points are classified through a two-level table: 0x1100 blocks of 256 code points each.
struct ClassTable {
    block_of: Vec<u16>,
    blocks: Vec<[u8; 256]>,
}

fn unicode_ranges(class: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::parse(class).expect("valid class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect(),
        other => panic!("unexpected HIR for {class}: {other:?}"),
    }
}

impl ClassTable {
    fn build() -> Self {
        let mut flat = vec![OTHER; 0x110000];
        for (class, value) in [(r"\s", SPACE), (r"\p{L}", LETTER), (r"\p{N}", NUMBER)] {
            for (lo, hi) in unicode_ranges(class) {
                flat[lo as usize..=hi as usize].fill(value);
            }
        }
        let mut blocks: Vec<[u8; 256]> = Vec::new();
        let mut block_of = Vec::with_capacity(0x1100);
        let mut seen = std::collections::HashMap::new();
        for chunk in flat.chunks(256) {
            let block: [u8; 256] = chunk.try_into().unwrap();
            let id = *seen.entry(block).or_insert_with(|| {
                blocks.push(block);
                blocks.len() - 1
            });
            block_of.push(id as u16);
        }
        ClassTable { block_of, blocks }
    }

    #[inline(always)]
    fn class(&self, cp: u32) -> u8 {
        self.blocks[self.block_of[(cp >> 8) as usize] as usize][(cp & 0xFF) as usize]
    }
}

fn table() -> &'static ClassTable {
    static TABLE: OnceLock<ClassTable> = OnceLock::new();
    TABLE.get_or_init(ClassTable::build)
}

/// ASCII classes, computed from the same table.
fn ascii_table() -> &'static [u8; 128] {
    static ASCII: OnceLock<[u8; 128]> = OnceLock::new();
    ASCII.get_or_init(|| std::array::from_fn(|i| table().class(i as u32)))
}

// ------------------------------------------------------------------------------------------------------------------
// The fast matcher
// ------------------------------------------------------------------------------------------------------------------

/// A cursor over the UTF-8 bytes of a `&str` that classifies code points.
struct Text<'a> {
    b: &'a [u8],
    table: &'static ClassTable,
    ascii: &'static [u8; 128],
}

impl Text<'_> {
    /// (code point, class, byte length) of the character starting at byte `i` (`i < len`).
    #[inline(always)]
    fn at(&self, i: usize) -> (u32, u8, usize) {
        let b = self.b;
        let b0 = b[i] as u32;
        if b0 < 0x80 {
            return (b0, self.ascii[b0 as usize], 1);
        }
        let (cp, len) = if b0 < 0xE0 {
            (((b0 & 0x1F) << 6) | (b[i + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (((b0 & 0x0F) << 12) | ((b[i + 1] as u32 & 0x3F) << 6) | (b[i + 2] as u32 & 0x3F), 3)
        } else {
            let cp = ((b0 & 0x07) << 18)
                | ((b[i + 1] as u32 & 0x3F) << 12)
                | ((b[i + 2] as u32 & 0x3F) << 6)
                | (b[i + 3] as u32 & 0x3F);
            (cp, 4)
        };
        (cp, self.table.class(cp), len)
    }

    #[inline(always)]
    fn class_at(&self, i: usize) -> u8 {
        if i >= self.b.len() {
            return 255;
        }
        let b0 = self.b[i];
        if b0 < 0x80 {
            self.ascii[b0 as usize]
        } else {
            self.at(i).1
        }
    }

    /// End of the run of characters of class `class` that starts at `i`.
    #[inline(always)]
    fn run(&self, mut i: usize, class: u8) -> usize {
        let n = self.b.len();
        while i < n {
            let b0 = self.b[i];
            if b0 < 0x80 {
                if self.ascii[b0 as usize] != class {
                    break;
                }
                i += 1;
            } else {
                let (_, c, len) = self.at(i);
                if c != class {
                    break;
                }
                i += len;
            }
        }
        i
    }
}

/// Does the text after an apostrophe at `i` start a contraction `(?i:[sdmt]|ll|ve|re)`? Returns its end.
#[inline]
fn contraction(t: &Text, i: usize) -> Option<usize> {
    let b = t.b;
    let j = i + 1;
    if j >= b.len() {
        return None;
    }
    match b[j] {
        b's' | b'S' | b'd' | b'D' | b'm' | b'M' | b't' | b'T' => return Some(j + 1),
        // U+017F LATIN SMALL LETTER LONG S folds to 's' under Unicode case-insensitive matching.
        0xC5 if b.get(j + 1) == Some(&0xBF) => return Some(j + 2),
        _ => {}
    }
    let second = match b[j] {
        b'l' | b'L' => b'l',
        b'v' | b'V' | b'r' | b'R' => b'e',
        _ => return None,
    };
    match b.get(j + 1) {
        Some(&c) if c.to_ascii_lowercase() == second => Some(j + 2),
        _ => None,
    }
}

/// Cut `text` as the GPT-4 style pattern does, calling `emit` with each piece in order.
/// `max_digits` is the `n` of `\p{N}{1,n}`.
pub fn split_fast<'a>(text: &'a str, max_digits: usize, mut emit: impl FnMut(&'a str)) {
    let t = Text { b: text.as_bytes(), table: table(), ascii: ascii_table() };
    let n = t.b.len();
    let mut i = 0;
    while i < n {
        let (cp, class, len) = t.at(i);
        let end = 'end: {
            // '(?i:[sdmt]|ll|ve|re)
            if cp == '\'' as u32 {
                if let Some(e) = contraction(&t, i) {
                    break 'end e;
                }
            }
            // [^\r\n\p{L}\p{N}]?+\p{L}+
            if class == LETTER {
                break 'end t.run(i + len, LETTER);
            }
            if class != NUMBER && cp != '\r' as u32 && cp != '\n' as u32 && t.class_at(i + len) == LETTER {
                break 'end t.run(i + len, LETTER);
            }
            // \p{N}{1,max_digits}
            if class == NUMBER {
                let mut e = i + len;
                for _ in 1..max_digits {
                    if e >= n {
                        break;
                    }
                    let (_, c, l) = t.at(e);
                    if c != NUMBER {
                        break;
                    }
                    e += l;
                }
                break 'end e;
            }
            //  ?[^\s\p{L}\p{N}]++[\r\n]*
            let punct_start = if class == OTHER {
                Some(i)
            } else if cp == ' ' as u32 && t.class_at(i + 1) == OTHER {
                Some(i + 1)
            } else {
                None
            };
            if let Some(s) = punct_start {
                let mut e = t.run(s, OTHER);
                while e < n && (t.b[e] == b'\r' || t.b[e] == b'\n') {
                    e += 1;
                }
                break 'end e;
            }
            // Whitespace: \s*[\r\n] | \s+(?!\S) | \s+
            debug_assert_eq!(class, SPACE);
            let mut e = i;
            let mut last_newline_end = None;
            let mut last_char_start = i;
            let mut chars = 0usize;
            while e < n {
                let (c, cl, l) = t.at(e);
                if cl != SPACE {
                    break;
                }
                if c == '\r' as u32 || c == '\n' as u32 {
                    last_newline_end = Some(e + l);
                }
                last_char_start = e;
                chars += 1;
                e += l;
            }
            if let Some(nl) = last_newline_end {
                break 'end nl;
            }
            if e == n || chars < 2 {
                break 'end e;
            }
            last_char_start
        };
        emit(&text[i..end]);
        i = end;
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Splitter
// ------------------------------------------------------------------------------------------------------------------

pub enum Splitter {
    Fast { max_digits: usize },
    Regex(Regex),
}

impl Splitter {
    /// The fast matcher for the two GPT-4 style patterns, fancy-regex for anything else.
    pub fn new(pattern: &str) -> Result<Self, String> {
        match pattern {
            NANOCHAT_PATTERN => Ok(Splitter::Fast { max_digits: 2 }),
            GPT4_PATTERN => Ok(Splitter::Fast { max_digits: 3 }),
            _ => Self::regex(pattern),
        }
    }

    /// Always fancy-regex (for testing the fast matcher against it).
    pub fn regex(pattern: &str) -> Result<Self, String> {
        Regex::new(pattern).map(Splitter::Regex).map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
    }

    /// Call `emit` with each piece of `text`. Fails only when fancy-regex gives up (backtrack limit).
    pub fn split<'a>(&self, text: &'a str, mut emit: impl FnMut(&'a str)) -> Result<(), String> {
        match self {
            Splitter::Fast { max_digits } => {
                split_fast(text, *max_digits, emit);
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on the text: {e}"))?;
                    emit(m.as_str());
                }
                Ok(())
            }
        }
    }
}
