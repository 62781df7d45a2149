package main

// jsonstrict.go holds JSON from outside to what its reader sees. encoding/json
// matches field names regardless of case, takes the last of duplicate keys and
// turns a lone surrogate escape into U+FFFD, so {"amount":5,"AMOUNT":99} would
// be read as 99 where a gateway that validates "amount" saw 5. These checks run
// on a value encoding/json has already accepted, and refuse what it would have
// read differently from its sender.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

var (
	errDuplicateKey  = errors.New("duplicate key")
	errFieldCase     = errors.New("field name in the wrong case")
	errLoneSurrogate = errors.New("lone surrogate escape")
)

// checkKeys walks a valid JSON value and refuses a key that appears twice in
// one object, at any depth, and a top-level key that equals a field of fields
// only when case is ignored. A key that matches no field is the caller's to
// judge: encoding/json's DisallowUnknownFields refuses it for the HTTP body,
// and payment results accept it.
func checkKeys(b []byte, fields []string) error {
	type object struct {
		keys    map[string]bool
		wantKey bool
	}
	var stack []*object // nil entries are arrays
	dec := json.NewDecoder(bytes.NewReader(b))
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		var top *object
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if key, ok := tok.(string); ok && top != nil && top.wantKey {
			if top.keys[key] {
				return fmt.Errorf("%w %q", errDuplicateKey, clip(key, 64))
			}
			top.keys[key] = true
			top.wantKey = false
			if len(stack) == 1 {
				if err := checkField(key, fields); err != nil {
					return err
				}
			}
			continue
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &object{keys: map[string]bool{}, wantKey: true})
			continue
		case json.Delim('['):
			stack = append(stack, nil)
			continue
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
		}
		// A value ended: its object, if it is in one, wants a key next.
		if len(stack) > 0 && stack[len(stack)-1] != nil {
			stack[len(stack)-1].wantKey = true
		}
	}
}

func checkField(key string, fields []string) error {
	for _, f := range fields {
		if key != f && bytes.EqualFold([]byte(key), []byte(f)) {
			return fmt.Errorf("%w: %q, want %q", errFieldCase, clip(key, 64), f)
		}
	}
	return nil
}

// findLoneSurrogate reports a \uXXXX escape of a UTF-16 surrogate that is not
// one half of a pair, in any string of the JSON text b: no Unicode character
// can be read from it.
func findLoneSurrogate(b []byte) error {
	inString := false
	for i := 0; i < len(b); i++ {
		switch c := b[i]; {
		case c == '"':
			inString = !inString
		case c == '\\' && inString:
			if i+1 < len(b) && b[i+1] == 'u' {
				r, ok := hex4(b, i+2)
				switch {
				case ok && r >= 0xD800 && r < 0xDC00:
					if lo, ok := hex4(b, i+8); ok && b[i+6] == '\\' && b[i+7] == 'u' && lo >= 0xDC00 && lo < 0xE000 {
						i += 6 // the pair's low half
						break
					}
					return fmt.Errorf("%w \\u%04x", errLoneSurrogate, r)
				case ok && r >= 0xDC00 && r < 0xE000:
					return fmt.Errorf("%w \\u%04x", errLoneSurrogate, r)
				}
			}
			i++ // the escaped character
		}
	}
	return nil
}

// hex4 reads the four hex digits at b[i:i+4].
func hex4(b []byte, i int) (rune, bool) {
	if i+4 > len(b) {
		return 0, false
	}
	var r rune
	for _, c := range b[i : i+4] {
		switch {
		case '0' <= c && c <= '9':
			r = r<<4 | rune(c-'0')
		case 'a' <= c && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case 'A' <= c && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}
