-- Orthanc -> MedServe forwarding (deploy/orthanc/forward-to-medserve.lua; see docs/pacs.md, "Orthanc").
--
-- Every instance Orthanc stores is sent to MedServe by DICOMweb STOW-RS, through the DICOMweb server "medserve"
-- of orthanc.json (DicomWeb.Servers), as an asynchronous Orthanc job: a modality's C-STORE or an upload never
-- waits for MedServe. MedServe's own results are not sent back (no loop): instances of the modalities in
-- SKIPPED_MODALITIES (MedServe writes SEG and SR) and instances whose Manufacturer is MedServe's.
--
-- A forward that fails (MedServe down) leaves a failed job in Orthanc: GET /jobs lists it, and
-- POST /jobs/{id}/resubmit sends it again. MedServe can also pull a study itself (POST /jobs on MedServe).

local MEDSERVE_SERVER = 'medserve'            -- the name in DicomWeb.Servers
local SKIPPED_MODALITIES = { SEG = true, SR = true }
local RESULT_MANUFACTURER = 'MedServe'        -- the Manufacturer of every object MedServe writes

local function IsMedServeResult(tags)
   if SKIPPED_MODALITIES[tags['Modality'] or ''] then
      return true
   end
   return (tags['Manufacturer'] or '') == RESULT_MANUFACTURER
end

function OnStoredInstance(instanceId, tags, metadata, origin)
   -- Orthanc ids are hashes of the UIDs: nothing that names the patient is printed.
   if IsMedServeResult(tags) then
      print('MedServe forwarding: not sent (a result): instance ' .. instanceId)
      return
   end
   local request = { Resources = { instanceId }, Synchronous = false }
   local answer = ParseJson(RestApiPost('/dicom-web/servers/' .. MEDSERVE_SERVER .. '/stow',
                                        DumpJson(request, true), false))
   print('MedServe forwarding: instance ' .. instanceId .. ' sent by job ' .. (answer['ID'] or '?'))
end
