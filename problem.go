package main

// problem.go writes every answer that is not the happy path as RFC 9457
// problem details, and every database failure as the status it deserves.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
)

// problemWriter replaces the mux's text/plain error body with a problem.
type problemWriter struct {
	http.ResponseWriter
	r       *http.Request
	problem bool
}

func (w *problemWriter) WriteHeader(code int) {
	if code < 400 {
		w.ResponseWriter.WriteHeader(code)
		return
	}
	w.problem = true
	detail := fmt.Sprintf("no route for %s %s", w.r.Method, w.r.URL.Path)
	if code == http.StatusMethodNotAllowed {
		detail = fmt.Sprintf("%s is not allowed on %s; allowed: %s", w.r.Method, w.r.URL.Path, w.Header().Get("Allow"))
	}
	w.Header().Del("Content-Length")
	writeProblem(w.ResponseWriter, code, detail)
}

func (w *problemWriter) Write(b []byte) (int, error) {
	if w.problem {
		return len(b), nil // the mux's text body, replaced
	}
	return w.ResponseWriter.Write(b)
}

// writeDBError answers 503 with Retry-After when the failure is transient
// (the database unreachable, read-only, too slow, or a conflict with another
// transaction: the client may retry) and 500 for anything else, which is a
// bug: requests are validated before they reach the database.
func writeDBError(w http.ResponseWriter, r *http.Request, log *slog.Logger, err error) {
	if errors.Is(r.Context().Err(), context.Canceled) {
		return // the client went away
	}
	if dbTransient(err) {
		log.WarnContext(r.Context(), "database unavailable", repeatsKey, repeatsOf("database unavailable", err), "route", r.Pattern, "err", err)
		w.Header().Set("Retry-After", "1")
		detail := "the database is unavailable; retry later"
		if errors.Is(err, errCommitOutcomeUnknown) {
			detail = "the database did not confirm whether the order was stored; retry with the same Idempotency-Key, " +
				"or list your orders before retrying without one"
		}
		writeProblem(w, http.StatusServiceUnavailable, detail)
		return
	}
	log.ErrorContext(r.Context(), "request failed", "route", r.Pattern, "err", err)
	writeProblem(w, http.StatusInternalServerError, "internal error")
}

// writeOverloaded answers a POST /orders refused unwritten: more orders are
// arriving than the writers can commit.
func writeOverloaded(w http.ResponseWriter, r *http.Request, log *slog.Logger) {
	log.WarnContext(r.Context(), "order refused: more orders are arriving than can be written", repeatsKey, "order refused")
	w.Header().Set("Retry-After", "1")
	writeProblem(w, http.StatusServiceUnavailable, "more orders are arriving than can be written; nothing was stored, retry later")
}

// problem is an RFC 9457 problem details object.
type problem struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

func writeProblem(w http.ResponseWriter, status int, detail string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(problem{Type: "about:blank", Title: http.StatusText(status), Status: status, Detail: detail}) //nolint:errcheck // the client is gone
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v) //nolint:errcheck // the client is gone
}

func recoverPanics(log *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				log.ErrorContext(r.Context(), "panic serving request", "route", r.Pattern, "panic", v)
				writeProblem(w, http.StatusInternalServerError, "internal error")
			}
		}()
		next.ServeHTTP(w, r)
	})
}
