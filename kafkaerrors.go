package main

// kafkaerrors.go sorts the errors of the Kafka client as dberrors.go sorts
// the database's: the broker's weather, retried, or anything else.

import (
	"context"
	"errors"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// brokerUnavailable says a batch failed because the cluster did not take it
// (unreachable, no leader, too few replicas, out of time), not because of
// the database or of what the records are: a broker refusal that retrying
// cannot cure (too large, not authorized) is the records' problem.
func brokerUnavailable(err error) bool {
	var pe produceError
	if !errors.As(err, &pe) {
		return false
	}
	var ke *kerr.Error
	return !errors.As(err, &ke) || ke.Retriable
}

// kafkaTransient: a broker error that retrying may cure.
func kafkaTransient(err error) bool {
	var ke *kerr.Error
	return errors.As(err, &ke) && ke.Retriable || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, kgo.ErrClientClosed) || errors.Is(err, kerr.UnknownTopicOrPartition)
}

// produceError marks a batch that failed at the broker, not at the database.
type produceError struct{ err error }

func (e produceError) Error() string { return e.err.Error() }

func (e produceError) Unwrap() error { return e.err }
