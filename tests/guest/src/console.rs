//! What the guest makes of its two inputs, machine-independent: lines typed
//! on COM1, and the i8042's keyboard bytes, where it looks for Ctrl-Alt-Del.

/// Longest line echoed whole; a longer one is echoed in pieces this long.
pub const MAX_LINE: usize = 120;

/// Collects COM1 input into lines. A line ends at `\n` or `\r` (a terminal
/// in raw mode sends `\r` for Enter); the `\n` of a `\r\n` ends nothing more.
pub struct LineBuffer {
    buf: [u8; MAX_LINE],
    len: usize,
    /// The last call returned a line: the next byte starts a new one.
    complete: bool,
    after_cr: bool,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuffer {
    pub const fn new() -> Self {
        LineBuffer {
            buf: [0; MAX_LINE],
            len: 0,
            complete: false,
            after_cr: false,
        }
    }

    /// Takes one byte; returns the line it completed, without its end.
    pub fn push(&mut self, byte: u8) -> Option<&[u8]> {
        if self.complete {
            self.len = 0;
            self.complete = false;
        }
        let after_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        match byte {
            b'\n' if after_cr => None,
            b'\n' | b'\r' => {
                self.complete = true;
                Some(&self.buf[..self.len])
            }
            _ => {
                self.buf[self.len] = byte;
                self.len += 1;
                if self.len == MAX_LINE {
                    self.complete = true;
                    return Some(&self.buf[..]);
                }
                None
            }
        }
    }
}

/// Scan code set 2 (what the i8042 passes on untranslated, and what our
/// VMM sends): `E0` prefixes an extended key, `F0` a release.
const PREFIX_EXTENDED: u8 = 0xe0;
const PREFIX_RELEASE: u8 = 0xf0;
/// Left Ctrl; `E0 14` is right Ctrl.
const KEY_CTRL: u8 = 0x14;
/// Left Alt; `E0 11` is right Alt.
const KEY_ALT: u8 = 0x11;
/// `E0 71` is Delete; plain `71` is the keypad's Del (`.`), which PC
/// keymaps treat alike here.
const KEY_DELETE: u8 = 0x71;

/// Follows the keyboard's bytes and says when Delete goes down while a Ctrl
/// and an Alt are held.
#[derive(Default)]
pub struct CtrlAltDel {
    ctrl: bool,
    alt: bool,
    release: bool,
    extended: bool,
}

impl CtrlAltDel {
    pub const fn new() -> Self {
        CtrlAltDel {
            ctrl: false,
            alt: false,
            release: false,
            extended: false,
        }
    }

    /// Takes one byte from the keyboard; true when it completes Ctrl-Alt-Del.
    pub fn push(&mut self, byte: u8) -> bool {
        match byte {
            PREFIX_EXTENDED => self.extended = true,
            PREFIX_RELEASE => self.release = true,
            key => {
                let down = !core::mem::take(&mut self.release);
                self.extended = false;
                match key {
                    KEY_CTRL => self.ctrl = down,
                    KEY_ALT => self.alt = down,
                    KEY_DELETE => return down && self.ctrl && self.alt,
                    // Other keys, and controller answers (an ACK is 0xfa).
                    _ => {}
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Vec<u8>> {
        let mut b = LineBuffer::new();
        input
            .iter()
            .filter_map(|&c| b.push(c).map(<[u8]>::to_vec))
            .collect()
    }

    #[test]
    fn lines_end_at_cr_lf_or_crlf_and_long_ones_are_split() {
        assert_eq!(lines(b"hello\n"), [b"hello".to_vec()]);
        assert_eq!(
            lines(b"a\rb\r\nc\n\nd"),
            [b"a".to_vec(), b"b".to_vec(), b"c".to_vec(), vec![]]
        );
        assert_eq!(lines(b"\r\n\r\n"), [vec![], vec![]]);
        let long = [b'x'; MAX_LINE + 5];
        let mut input = long.to_vec();
        input.push(b'\n');
        let got = lines(&input);
        assert_eq!(got, [vec![b'x'; MAX_LINE], vec![b'x'; 5]]);
        // Nothing without an end.
        assert!(lines(b"partial").is_empty());
    }

    /// Ctrl, Alt, Delete down and up: what the VMM's i8042 sends.
    const SEQUENCE: [u8; 11] = [
        0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
    ];

    fn hits(d: &mut CtrlAltDel, bytes: &[u8]) -> usize {
        bytes.iter().filter(|&&b| d.push(b)).count()
    }

    #[test]
    fn ctrl_alt_del_is_seen_once_per_press_and_only_with_both_held() {
        let mut d = CtrlAltDel::new();
        assert_eq!(hits(&mut d, &SEQUENCE), 1);
        // Again: the releases left the keys up, so it is new.
        assert_eq!(hits(&mut d, &SEQUENCE), 1);
        // Right Ctrl and right Alt, keypad Del, presses alone.
        assert_eq!(
            hits(&mut CtrlAltDel::new(), &[0xe0, 0x14, 0xe0, 0x11, 0x71]),
            1
        );
        // Delete alone, with one modifier, or after a modifier's release.
        for bytes in [
            &[0xe0, 0x71][..],
            &[0x14, 0xe0, 0x71],
            &[0x11, 0xe0, 0x71],
            &[0x14, 0x11, 0xf0, 0x14, 0xe0, 0x71],
            // The release of Delete while both are held.
            &[0x14, 0x11, 0xe0, 0xf0, 0x71],
            // Other keys and controller ACKs in between change nothing.
            &[0xfa, 0x1c, 0xf0, 0x1c],
        ] {
            assert_eq!(hits(&mut CtrlAltDel::new(), bytes), 0, "{bytes:x?}");
        }
        let mut d = CtrlAltDel::new();
        assert_eq!(
            hits(&mut d, &[0x14, 0xfa, 0x11, 0x1c, 0xf0, 0x1c, 0xe0, 0x71]),
            1
        );
    }
}
