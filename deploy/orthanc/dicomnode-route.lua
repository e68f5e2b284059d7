-- Orthanc auto-routing to dicomnode: once a study is stable (no new instance for
-- "StableAge" seconds), send its breast image series (MG: FFDM, DBT, synthetic 2D; DX/CR
-- with Body Part BREAST) to the node. The node sends its SR, SEG and Parametric Maps back
-- into the same study; those series are never routed again.
--
-- Each routed series is marked with the user metadata "DicomnodeRouted" (declared in
-- orthanc.json "UserMetadata"), so a study that becomes stable again (when the results
-- arrive, or when a late series comes in) only routes the series not yet sent.

local NODE_MODALITY = 'dicomnode'   -- key of the node in orthanc.json "DicomModalities"
local MARK = 'DicomnodeRouted'

local function is_breast_image_series(series)
  local tags = series['MainDicomTags'] or {}
  local modality = tags['Modality'] or ''
  if modality == 'MG' then
    return true
  end
  local body_part = string.upper(tags['BodyPartExamined'] or '')
  return (modality == 'DX' or modality == 'CR') and body_part == 'BREAST'
end

local function already_routed(series_id)
  local names = ParseJson(RestApiGet('/series/' .. series_id .. '/metadata'))
  for _, name in ipairs(names) do
    if name == MARK then
      return true
    end
  end
  return false
end

function OnStableStudy(studyId, tags, metadata)
  local series_list = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local to_send = {}
  for _, series in ipairs(series_list) do
    if is_breast_image_series(series) and not already_routed(series['ID']) then
      table.insert(to_send, series['ID'])
    end
  end
  if #to_send == 0 then
    return
  end
  -- Asynchronous job: the Lua thread is not held while the node receives. A job that fails
  -- (node down) shows in Orthanc's job list and can be resubmitted (POST /jobs/{id}/resubmit).
  -- The body is written out by hand: series IDs are plain hex strings.
  local body = '{"Resources":["' .. table.concat(to_send, '","') .. '"],"Synchronous":false}'
  local answer = ParseJson(RestApiPost('/modalities/' .. NODE_MODALITY .. '/store', body))
  for _, id in ipairs(to_send) do
    RestApiPut('/series/' .. id .. '/metadata/' .. MARK, answer['ID'] or 'sent')
  end
  print('dicomnode: routed ' .. #to_send .. ' series of study ' .. studyId ..
        ' (job ' .. tostring(answer['ID']) .. ')')
end
