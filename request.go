package main

// request.go reads what a request carries: the user, the order id, the
// body of a new order and the page cursor, each checked before use.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

const (
	maxBodyBytes    = 1 << 20
	bodyReadTimeout = 5 * time.Second
	maxDescription  = 1000
	maxUserID       = 128
	maxIdempotency  = 255
	defaultPageSize = 50
	maxPageSize     = 500
)

type createOrderRequest struct {
	Amount      json.RawMessage `json:"amount"` // read by orderAmount
	Description *string         `json:"description"`
}

// orderFields are createOrderRequest's fields, exactly as they are spelled.
var orderFields = []string{"amount", "description"}

// requireUser reads X-User-Id. Authentication happens upstream (a gateway);
// this service trusts the header but still bounds what it stores.
func requireUser(w http.ResponseWriter, r *http.Request) (string, bool) {
	vals := r.Header.Values("X-User-Id")
	if len(vals) == 0 || vals[0] == "" {
		// The scheme names the header the gateway in front of this
		// service sets; RFC 9110 asks a 401 to name its challenge.
		w.Header().Set("WWW-Authenticate", `X-User-Id realm="order-service"`)
		writeProblem(w, http.StatusUnauthorized, "the X-User-Id header is required")
		return "", false
	}
	if len(vals) > 1 || !printable(vals[0], maxUserID) {
		writeProblem(w, http.StatusBadRequest, fmt.Sprintf("X-User-Id must be one header of 1 to %d printable characters", maxUserID))
		return "", false
	}
	return vals[0], true
}

// requireUserAndOrderID reads X-User-Id and the {id} of /orders/{id}.
func requireUserAndOrderID(w http.ResponseWriter, r *http.Request) (userID, id string, ok bool) {
	if userID, ok = requireUser(w, r); !ok {
		return "", "", false
	}
	id = strings.ToLower(r.PathValue("id"))
	if !isUUID(id) {
		writeProblem(w, http.StatusBadRequest, "order id must be a UUID")
		return "", "", false
	}
	return userID, id, true
}

// orderInput is a validated POST /orders body.
type orderInput struct {
	Amount      int64
	Description string
}

// decodeOrderInput reads and validates a POST /orders body; a non-nil problem
// says what is wrong with it (400, or 413 past maxBodyBytes).
func decodeOrderInput(body io.Reader) (orderInput, *problem) {
	b, err := io.ReadAll(body)
	var mbe *http.MaxBytesError
	var ne net.Error
	switch {
	case errors.As(err, &mbe):
		return orderInput{}, &problem{Status: http.StatusRequestEntityTooLarge, Detail: fmt.Sprintf("request body is larger than %d bytes", mbe.Limit)}
	case errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return orderInput{}, &problem{Status: http.StatusRequestTimeout, Detail: fmt.Sprintf("the request body did not arrive within %s", bodyReadTimeout)}
	case err != nil:
		// Not err's text: it names the socket's addresses.
		return orderInput{}, badRequest("the request body could not be read whole")
	}
	if !utf8.Valid(b) {
		// encoding/json would quietly turn bad bytes into U+FFFD, and the
		// stored description would differ from what the client sent.
		return orderInput{}, badRequest("request body is not valid UTF-8")
	}
	if err := findLoneSurrogate(b); err != nil {
		// encoding/json would store U+FFFD in its place, as for bad UTF-8.
		return orderInput{}, badRequest("request body holds a " + err.Error() + ": not a Unicode character")
	}
	req, err := decodeJSON[createOrderRequest](bytes.NewReader(b))
	if err != nil {
		return orderInput{}, decodeProblem(err)
	}
	if err := checkKeys(b, orderFields); err != nil {
		return orderInput{}, badRequest(err.Error())
	}
	amount, p := orderAmount(req.Amount)
	if p != nil {
		return orderInput{}, p
	}
	var desc string
	if req.Description != nil {
		desc = *req.Description
	}
	if n := utf8.RuneCountInString(desc); n > maxDescription {
		return orderInput{}, badRequest(fmt.Sprintf("description is %d characters long; at most %d are allowed", n, maxDescription))
	}
	if strings.ContainsRune(desc, 0) {
		// PostgreSQL text cannot hold NUL.
		return orderInput{}, badRequest("description must not contain NUL characters")
	}
	return orderInput{Amount: amount, Description: desc}, nil
}

// orderAmount reads amount as JSON Schema reads an integer: any JSON number
// whose value is whole, so 1500, 1500.0 and 1.5e3 are all 1500 (a generated
// client may send any of them); fractions, strings and values beyond int64
// are the client's mistake.
func orderAmount(raw json.RawMessage) (int64, *problem) {
	wrong := func(got string) (int64, *problem) {
		return 0, badRequest(fmt.Sprintf("amount must be an integer from 1 to %d (minor units), got %s", int64(1<<63-1), got))
	}
	s := string(raw)
	switch {
	case s == "" || s == "null":
		return 0, badRequest("amount is required")
	case s[0] == '"':
		return wrong("string")
	case s[0] == '{':
		return wrong("object")
	case s[0] == '[':
		return wrong("array")
	case s == "true" || s == "false":
		return wrong("bool")
	}
	n, ok := wholeNumber(s)
	switch {
	case !ok:
		return wrong("number " + s)
	case n <= 0:
		return 0, badRequest("amount must be a positive integer (minor units)")
	}
	return n, nil
}

// wholeNumber is the value of JSON number s when it is a whole number within
// int64. Exact: it works on the decimal digits, never on a float, and never
// builds a number longer than int64's 19 digits (1e999999999 is refused, not
// computed).
func wholeNumber(s string) (int64, bool) {
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, true
	}
	mant, exp, _ := strings.Cut(strings.ToLower(s), "e")
	e := 0
	if exp != "" {
		var err error
		if e, err = strconv.Atoi(exp); err != nil {
			return 0, false
		}
	}
	sign := ""
	if strings.HasPrefix(mant, "-") {
		sign, mant = "-", mant[1:]
	}
	whole, frac, _ := strings.Cut(mant, ".")
	digits := strings.TrimLeft(whole+frac, "0")
	e -= len(frac)
	trimmed := strings.TrimRight(digits, "0")
	e += len(digits) - len(trimmed)
	switch {
	case trimmed == "":
		return 0, true
	case e < 0 || len(trimmed)+e > 19:
		return 0, false
	}
	n, err := strconv.ParseInt(sign+trimmed+strings.Repeat("0", e), 10, 64)
	return n, err == nil
}

// decodeJSON reads exactly one JSON value with no unknown fields.
func decodeJSON[T any](body io.Reader) (T, error) {
	var v T
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return v, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return v, errors.New("request body must hold a single JSON object")
	}
	return v, nil
}

func badRequest(detail string) *problem {
	return &problem{Status: http.StatusBadRequest, Detail: detail}
}

// acceptedBodyType: JSON, or no type at all, or the form type curl's -d sends
// unless told otherwise, so that the plainest curl line works; the body is
// read as JSON whatever the type says.
func acceptedBodyType(contentType string) bool {
	if contentType == "" {
		return true
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		return false
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return false
	}
	return mt == "application/json" || mt == "application/x-www-form-urlencoded"
}

// decodeProblem explains a decoding error in the client's terms.
func decodeProblem(err error) *problem {
	var (
		se *json.SyntaxError
		te *json.UnmarshalTypeError
	)
	switch {
	case errors.Is(err, io.EOF):
		return badRequest("request body is empty; want a JSON object such as {\"amount\": 1000}")
	case errors.As(err, &se), errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest("request body is not valid JSON: " + err.Error())
	case errors.As(err, &te) && te.Field != "":
		return badRequest(fmt.Sprintf("%s must be a %s, got %s", te.Field, te.Type, te.Value))
	case errors.As(err, &te):
		return badRequest("request body must be a JSON object, got " + te.Value)
	default:
		// Unknown fields and trailing data; the decoder's text names the field.
		return badRequest(strings.TrimPrefix(err.Error(), "json: "))
	}
}

// The cursor is "<created_at in µs since 1970>.<order id>" of the last order
// of a page: opaque to clients, who pass back next_cursor, but with a format
// openapi.yaml can state exactly, so that every value it allows is accepted.
func encodeCursor(k pageKey) string {
	return strconv.FormatInt(k.CreatedAt.UnixMicro(), 10) + "." + k.ID
}

// maxCursorDigits bounds the timestamp to year 5138: no order is newer, and
// PostgreSQL holds it.
const maxCursorDigits = 17

func decodeCursor(s string) (pageKey, error) {
	ts, id, ok := strings.Cut(s, ".")
	if !ok || ts == "" || len(ts) > maxCursorDigits || strings.Trim(ts, "0123456789") != "" || !isUUID(id) {
		return pageKey{}, errors.New("malformed cursor")
	}
	us, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return pageKey{}, errors.New("malformed cursor")
	}
	return pageKey{CreatedAt: time.UnixMicro(us).UTC(), ID: id}, nil
}
