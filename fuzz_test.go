package main

// Fuzz targets for the two places where outside bytes enter the service: the
// POST /orders body and a payment-results value. The seed corpus lives in
// testdata/fuzz and runs with every `go test`; .ci/run fuzzes each briefly.

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"unicode/utf8"
)

func FuzzDecodeOrderInput(f *testing.F) {
	f.Fuzz(func(t *testing.T, body []byte) {
		in, p := decodeOrderInput(http.MaxBytesReader(nil, io.NopCloser(bytes.NewReader(body)), maxBodyBytes))
		if p != nil {
			if p.Status != http.StatusBadRequest && p.Status != http.StatusRequestEntityTooLarge || p.Detail == "" {
				t.Fatalf("rejection %+v", p)
			}
			return
		}
		if in.Amount <= 0 || utf8.RuneCountInString(in.Description) > maxDescription ||
			!utf8.ValidString(in.Description) || strings.ContainsRune(in.Description, 0) {
			t.Fatalf("accepted an invalid order %+v from %q", in, body)
		}
		// What was accepted, sent again, is accepted as the same order.
		again, _ := json.Marshal(map[string]any{"amount": in.Amount, "description": in.Description})
		in2, p2 := decodeOrderInput(bytes.NewReader(again))
		if p2 != nil || in2 != in {
			t.Fatalf("round trip of %+v: %+v, %+v", in, in2, p2)
		}
	})
}

func FuzzDecodePaymentResult(f *testing.F) {
	f.Fuzz(func(t *testing.T, value []byte) {
		res, err := decodePaymentResult(value)
		if err != nil {
			if !errors.Is(err, errPoison) {
				t.Fatalf("rejection %v is not marked poison: it would be retried forever", err)
			}
			return
		}
		if !isUUID(res.OrderID) || res.Status != "PAID" && res.Status != "FAILED" || res.Status == "PAID" && res.Reason != nil {
			t.Fatalf("accepted %+v from %q", res, value)
		}
	})
}
