// go-offsets prints, from the DWARF of unstripped Go binaries, the runtime offsets the profiler
// needs to find a goroutine's pprof labels (receiver/profiling/runtimes/go.py, GO_OFFSETS):
// g.m, m.g0, m.curg, g.labels, and what runtime/pprof.labelMap is (a map, Go <= 1.23; a struct
// holding a slice of {key, value string}, Go >= 1.24) with the layouts read through it.
//
//	go run ./deploy/scripts/go-offsets BINARY...   (each built with pprof imported, no -w)
//
// tests/profiling/test_go_labels_e2e.py builds one per toolchain and checks the table against it.
package main

import (
	"debug/buildinfo"
	"debug/dwarf"
	"debug/elf"
	"encoding/json"
	"fmt"
	"os"
)

var wanted = map[string]bool{
	"runtime.g": true, "runtime.m": true, "runtime/pprof.labelMap": true,
	// Go 1.24: labelMap{LabelSet{list []label{key, value}}}
	"runtime/pprof.LabelSet": true, "runtime/pprof.label": true,
	// Go 1.25+: labelMap{label.Set{list []label.Label{Key, Value}}}
	"internal/runtime/pprof/label.Set": true, "internal/runtime/pprof/label.Label": true,
	// Go <= 1.23: labelMap is map[string]string
	"hash<string,string>": true, "bucket<string,string>": true,
}

func structs(d *dwarf.Data) (map[string]*dwarf.StructType, map[string]dwarf.Type, error) {
	st := map[string]*dwarf.StructType{}
	named := map[string]dwarf.Type{}
	r := d.Reader()
	for {
		e, err := r.Next()
		if err != nil {
			return nil, nil, err
		}
		if e == nil {
			return st, named, nil
		}
		name, _ := e.Val(dwarf.AttrName).(string)
		switch e.Tag {
		case dwarf.TagStructType, dwarf.TagTypedef:
			if !wanted[name] {
				continue
			}
			t, err := d.Type(e.Offset)
			if err != nil {
				return nil, nil, err
			}
			named[name] = t
			if s, ok := t.(*dwarf.StructType); ok {
				st[name] = s
			}
		}
	}
}

func field(s *dwarf.StructType, name string) (int64, bool) {
	if s == nil {
		return 0, false
	}
	for _, f := range s.Field {
		if f.Name == name {
			return f.ByteOffset, true
		}
	}
	return 0, false
}

func one(path string) (map[string]any, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d, err := f.DWARF()
	if err != nil {
		return nil, fmt.Errorf("%s: no DWARF (built with -w?): %w", path, err)
	}
	bi, err := buildinfo.ReadFile(path)
	if err != nil {
		return nil, err
	}
	st, named, err := structs(d)
	if err != nil {
		return nil, err
	}
	out := map[string]any{"binary": path, "go": bi.GoVersion}
	need := []struct{ key, typ, field string }{
		{"g.m", "runtime.g", "m"}, {"g.labels", "runtime.g", "labels"},
		{"m.g0", "runtime.m", "g0"}, {"m.curg", "runtime.m", "curg"},
	}
	for _, n := range need {
		off, ok := field(st[n.typ], n.field)
		if !ok {
			return nil, fmt.Errorf("%s: %s has no field %s", path, n.typ, n.field)
		}
		out[n.key] = off
	}
	lm, ok := named["runtime/pprof.labelMap"]
	if !ok {
		return nil, fmt.Errorf("%s: no runtime/pprof.labelMap (runtime/pprof not linked in)", path)
	}
	if td, isTypedef := lm.(*dwarf.TypedefType); isTypedef {
		lm = td.Type
	}
	switch t := lm.(type) {
	case *dwarf.StructType: // Go >= 1.24: labelMap{LabelSet{list []label}}
		out["labels"] = "slice"
		set, setName, lab, keyName, valueName := "runtime/pprof.LabelSet", "LabelSet", "runtime/pprof.label", "key", "value"
		if _, ok := field(t, "Set"); ok {
			set, setName, lab, keyName, valueName = "internal/runtime/pprof/label.Set", "Set", "internal/runtime/pprof/label.Label", "Key", "Value"
		}
		ls, ok1 := field(t, setName)
		list, ok2 := field(st[set], "list")
		if !ok2 {
			list, ok2 = field(st[set], "List") // Go 1.26
		}
		k, ok3 := field(st[lab], keyName)
		v, ok4 := field(st[lab], valueName)
		if !(ok1 && ok2 && ok3 && ok4) {
			return nil, fmt.Errorf("%s: labelMap is a struct, but not {%s{list []{%s, %s string}}}", path, set, keyName, valueName)
		}
		out["labelMap.list"] = ls + list
		out["label.key"], out["label.value"] = k, v
		out["label.size"] = st[lab].ByteSize
	default: // Go <= 1.23: map[string]string, a *hmap
		out["labels"] = "map"
		out["labelMap.type"] = lm.String()
		h := st["hash<string,string>"]
		for _, n := range []string{"count", "B", "buckets", "oldbuckets"} {
			off, ok := field(h, n)
			if !ok {
				return nil, fmt.Errorf("%s: runtime.hmap has no field %s", path, n)
			}
			out["hmap."+n] = off
		}
		b := st["bucket<string,string>"]
		if b == nil {
			return nil, fmt.Errorf("%s: no DWARF type for a map[string]string bucket", path)
		}
		for _, n := range []string{"tophash", "keys", "values", "overflow"} {
			off, ok := field(b, n)
			if !ok {
				return nil, fmt.Errorf("%s: map bucket has no field %s", path, n)
			}
			out["bucket."+n] = off
		}
		out["bucket.size"] = b.ByteSize
	}
	return out, nil
}

func main() {
	enc := json.NewEncoder(os.Stdout)
	status := 0
	for _, path := range os.Args[1:] {
		o, err := one(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "go-offsets:", err)
			status = 1
			continue
		}
		_ = enc.Encode(o)
	}
	os.Exit(status)
}
