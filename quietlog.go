package main

// quietlog.go keeps the log readable in a storm. A failure that repeats once
// per request or per retry (the database down, answered 503 to every request)
// would write hundreds of identical lines a minute and bury everything else.
// A log call opts in with a "repeats" attribute naming what repeats; of the
// records with the same name, one is written per repeatInterval, and it says
// how many were left out since the last one written.

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// repeatInterval is how often a repeated failure is written at most.
const repeatInterval = 10 * time.Second

// repeatsKey is the attribute that names a record's kind of repeat.
const repeatsKey = "repeats"

type quietHandler struct {
	slog.Handler
	state *repeats
}

type repeats struct {
	mu   sync.Mutex
	last map[string]repeat // by the repeats attribute: a few fixed names, never outside input
}

type repeat struct {
	written time.Time
	left    int // left out since
}

func newQuietHandler(h slog.Handler) quietHandler {
	return quietHandler{Handler: h, state: &repeats{last: map[string]repeat{}}}
}

func (h quietHandler) Handle(ctx context.Context, r slog.Record) error {
	var name string
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == repeatsKey {
			name = a.Value.String()
			return false
		}
		return true
	})
	if name == "" {
		return h.Handler.Handle(ctx, r)
	}
	h.state.mu.Lock()
	prev, seen := h.state.last[name]
	if seen && r.Time.Sub(prev.written) < repeatInterval {
		prev.left++
		h.state.last[name] = prev
		h.state.mu.Unlock()
		return nil
	}
	h.state.last[name] = repeat{written: r.Time}
	h.state.mu.Unlock()
	// The record without its name, and with the count it stands for.
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		if a.Key != repeatsKey {
			out.AddAttrs(a)
		}
		return true
	})
	if prev.left > 0 {
		out.AddAttrs(slog.Int("repeated", prev.left), slog.Duration("since", r.Time.Sub(prev.written).Round(time.Second)))
	}
	return h.Handler.Handle(ctx, out)
}

func (h quietHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return quietHandler{Handler: h.Handler.WithAttrs(attrs), state: h.state}
}

func (h quietHandler) WithGroup(name string) slog.Handler {
	return quietHandler{Handler: h.Handler.WithGroup(name), state: h.state}
}

// repeatsOf names a failure for quietHandler: what failed, and whether the
// database is read-only, a state of its own (a failover under way) that an
// operator must see as soon as it begins, however recently the same thing
// failed otherwise.
func repeatsOf(what string, err error) string {
	if dbReadOnly(err) {
		return what + " (read-only)"
	}
	return what
}
