package main

// text.go holds the identifiers and text helpers every part uses: the ids
// the service makes (UUIDv7), and the checks and cuts applied to text that
// comes from outside.

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// printable: s is valid UTF-8, not empty, at most maxChars characters, and
// holds only printable characters (no control characters).
func printable(s string, maxChars int) bool {
	if s == "" || !utf8.ValidString(s) || utf8.RuneCountInString(s) > maxChars {
		return false
	}
	for _, c := range s {
		if !unicode.IsPrint(c) {
			return false
		}
	}
	return true
}

// newUUID returns a version 7 UUID: time-ordered, so new orders and events
// land at the right edge of their indexes instead of at random pages.
func newUUID() string {
	var u [16]byte
	binary.BigEndian.PutUint64(u[:8], uint64(time.Now().UnixMilli())<<16)
	rand.Read(u[6:])
	u[6] = u[6]&0x0f | 0x70 // version 7
	u[8] = u[8]&0x3f | 0x80 // RFC 9562 variant
	var s [36]byte
	hex.Encode(s[0:8], u[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], u[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], u[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], u[8:10])
	s[23] = '-'
	hex.Encode(s[24:], u[10:])
	return string(s[:])
}

// isUUID accepts the canonical lowercase 8-4-4-4-12 form only.
func isUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, c := range []byte(s) {
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// clip cuts s to at most n bytes of valid UTF-8, so that an error quoting an
// outside value stays small whatever the value's size.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}
