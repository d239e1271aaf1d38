//! Unicode helpers for the BPE pre-tokenizers: llama.cpp's per-codepoint flags
//! (`unicode_cpt_flags`) and the GPT-2 byte <-> unicode map.

use unicode_general_category::{get_general_category, GeneralCategory as G};

/// The subset of llama.cpp's codepoint flags the pre-tokenizers look at.
/// `NONE` (all bits clear) stands for "past the end of the chunk", which llama.cpp
/// encodes as an all-zero flag set; every real codepoint has `DEFINED`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Flags(u8);

impl Flags {
    const DEFINED: u8 = 1;
    const LETTER: u8 = 2;
    const NUMBER: u8 = 4;
    const PUNCT: u8 = 8;
    const WHITESPACE: u8 = 16;

    pub(crate) const NONE: Flags = Flags(0);

    #[inline]
    pub(crate) fn any(self) -> bool {
        self.0 != 0
    }
    #[inline]
    pub(crate) fn letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    #[inline]
    pub(crate) fn number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    #[inline]
    pub(crate) fn punct(self) -> bool {
        self.0 & Self::PUNCT != 0
    }
    #[inline]
    pub(crate) fn ws(self) -> bool {
        self.0 & Self::WHITESPACE != 0
    }
}

/// \p{L}, \p{N}, \p{P} as general categories (llama.cpp derives its tables from
/// Python's `regex` module, i.e. the same categories); whitespace is the Unicode
/// White_Space property, which is both Rust's `char::is_whitespace` and llama.cpp's
/// `unicode_set_whitespace` (25 codepoints).
pub(crate) fn flags(c: char) -> Flags {
    let mut f = Flags::DEFINED;
    if c.is_whitespace() {
        f |= Flags::WHITESPACE;
    }
    if c.is_ascii() {
        if c.is_ascii_alphabetic() {
            f |= Flags::LETTER;
        } else if c.is_ascii_digit() {
            f |= Flags::NUMBER;
        } else if matches!(
            c,
            '!' | '"'
                | '#'
                | '%'
                | '&'
                | '\''
                | '('
                | ')'
                | '*'
                | ','
                | '-'
                | '.'
                | '/'
                | ':'
                | ';'
                | '?'
                | '@'
                | '['
                | '\\'
                | ']'
                | '_'
                | '{'
                | '}'
        ) {
            f |= Flags::PUNCT;
        }
        return Flags(f);
    }
    match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => f |= Flags::LETTER,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => f |= Flags::NUMBER,
        G::ConnectorPunctuation
        | G::DashPunctuation
        | G::OpenPunctuation
        | G::ClosePunctuation
        | G::InitialPunctuation
        | G::FinalPunctuation
        | G::OtherPunctuation => f |= Flags::PUNCT,
        _ => {}
    }
    Flags(f)
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the other 68
/// (0x00-0x20, 0x7F-0xA0, 0xAD) to U+0100.. in byte order.
#[inline]
pub(crate) fn byte_to_char(b: u8) -> char {
    let cp = match b {
        0x00..=0x20 => 0x100 + b as u32,
        0x7F..=0xA0 => 0x100 + 33 + (b as u32 - 0x7F),
        0xAD => 0x100 + 67,
        _ => b as u32,
    };
    // All values above are valid scalar values (< 0x144).
    char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Inverse of [`byte_to_char`]; `None` for characters outside the map.
#[inline]
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cp as u8),
        0x100..=0x120 => Some((cp - 0x100) as u8),
        0x121..=0x142 => Some((cp - 0x121 + 0x7F) as u8),
        0x143 => Some(0xAD),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_round_trips() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "{b:#x} maps to a used char");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(char_to_byte('€'), None);
    }

    #[test]
    fn flags_match_categories() {
        assert!(flags('a').letter() && flags('é').letter() && flags('日').letter());
        assert!(flags('7').number() && flags('٣').number() && flags('Ⅻ').number());
        assert!(flags('!').punct() && flags('«').punct() && !flags('$').punct());
        assert!(flags('\u{a0}').ws() && flags('\u{3000}').ws() && !flags('\u{1c}').ws());
        assert!(flags('\u{301}').any() && !flags('\u{301}').letter());
        assert!(!Flags::NONE.any());
    }
}
